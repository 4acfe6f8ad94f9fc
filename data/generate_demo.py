"""Generate the demo task's prompts: customer-support messages to an online store, one gold label each.

Stdlib only and seeded, so re-running gives byte-identical output:

    .venv/bin/python data/generate_demo.py [--out data/prompts.jsonl]

Every message is a hand-written phrasing for one intent, filled with slot values (products, order numbers,
amounts, ...) and sometimes dressed up with a greeting, a sign-off, a tone, casing or a typo. Phrasings are
written so that a human reader would pick the same single label.
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611
PER_LABEL = 105  # 12 labels x 105 = 1,260 prompts
MAX_WORDS = 80

# Hand-written phrasings per label; each list ends with two longer, multi-sentence messages.
TEMPLATES: dict[str, list[str]] = {
    "track_order": [
        "Where is my order {order}?",
        "where's my order??",
        "I ordered a {product} on {date} and it still hasn't arrived. Can you tell me where it is?",
        "Can you give me a tracking number for order {order}?",
        "The tracking page for {order} hasn't updated in {days} days. Is it lost?",
        "Has my {product} shipped yet?",
        "When will order {order} be delivered?",
        "My package was supposed to arrive on {date} but it's not here. Where is it?",
        "Any update on the delivery of my {product}? Order {order}.",
        "I need the {product} before {date}. Is it going to get to {city} in time?",
        "tracking link says 'label created' for a week now, order {order}. is it actually moving?",
        "Could you check the shipping status of my order please?",
        "It has said 'out for delivery' since yesterday but nothing showed up. Order {order}.",
        "Which courier is delivering order {order} and how can I follow it?",
        "I ordered a {product} {days} days ago and haven't seen it yet. How long does shipping to {city} take?",
        "I never got a shipping confirmation email for {order}. Has it left the warehouse?",
        "Still waiting on my {product}. It's been {days} days. What's going on?",
        "Is there an estimated delivery date for order {order}?",
        "The tracking number you sent doesn't work on the carrier's site. Can you check where my parcel is?",
        "Just wondering if my order has been dispatched yet.",
        "Order {order} shows as delivered but I haven't received anything. Where did it go?",
        "Can you tell me where my {product} is right now?",
        "order {order} status?",
        "I placed an order on {date} for a {product}. How far along is it?",
        "Is my parcel stuck in customs? Order {order} has been 'in transit' to {city} for ages.",
        "Need an ETA on my package please, order {order}",
        "Been refreshing the tracking page all morning. When is my {product} actually arriving?",
        "My order was split into two shipments and only one arrived. Where is the rest of {order}?",
        "I ordered a {product} on {date} as a birthday present for my brother and the site said it would take three to five days. It's now been {days} days and the tracking still just says 'processing'. His birthday is this weekend, so can you please tell me where the parcel actually is and when it will arrive?",
        "I live in {city} and usually get my orders within a week. Order {order} was dispatched on {date} according to the email, but the courier's website has no record of the tracking number. Could you check with them and let me know where my package is?",
    ],
    "return_item": [
        "How do I return the {product} I bought?",
        "I'd like to send back the {garment}, it doesn't fit.",
        "Can I still return something I bought on {date}?",
        "The {product} isn't what I expected. How do I start a return?",
        "i want to return my order {order}",
        "Can you send me a return label for order {order}?",
        "What's your return policy? I have a {product} I don't need anymore.",
        "I changed my mind about the {product}. I got it {days} days ago, is it too late to return it?",
        "The {garment} is too small. Can I send it back?",
        "Where do I drop off a return in {city}?",
        "I accidentally bought the {product} twice and want to return one of them.",
        "Do I have to pay for return shipping on the {product}?",
        "I need to return a gift I received, a {product}. I only have the order number, {order}.",
        "The colour of the {garment} looks totally different in person. I'd like to return it.",
        "How many days do I have to return something? I bought a {product} on {date}.",
        "I want to send the {product} back. It works fine, I just don't like it.",
        "Can I exchange the {garment} for a different size, or do I need to return it first?",
        "The return portal keeps giving me an error for order {order}. How else can I return it?",
        "Is it possible to return just one item from order {order}?",
        "ordered the {product} but found it cheaper locally, want to return it unopened",
        "Please arrange a pickup for my return, I can't get to a post office. Order {order}.",
        "I'd like to return the {product}. Do I need the original box?",
        "What's the process for returning items bought in the sale?",
        "The {garment} doesn't suit me. Please tell me how to return it.",
        "want to return the {product} from order {order}, what do i do",
        "Can I return the {product} at your store in {city} instead of mailing it?",
        "My kid ordered a {product} without asking. Can we return it?",
        "Return request for order {order} please, the {garment} is uncomfortable to wear.",
        "I bought the {garment} in size {size} on {date} after reading the size guide, but it's far too tight across the shoulders. It's unworn and still has the tags on. I'd like to send it back rather than exchange it. Could you tell me how to start the return and whether I need to print a label?",
        "We received the {product} from order {order} last week and, honestly, it's just not right for our flat. Nothing is wrong with it, we simply don't want it. Is it still within the return window, and can I drop the parcel at a post office in {city}?",
    ],
    "refund_status": [
        "I returned the {product} {days} days ago and still haven't got my refund. When will I see it?",
        "Where is my refund for order {order}?",
        "you said the refund was processed on {date} but nothing in my account yet",
        "How long do refunds take to show up on my card?",
        "I cancelled order {order} last week. Has the refund of {amount} gone through?",
        "Can you confirm you received my return and issued the refund?",
        "Still waiting for my {amount} refund. It's been over two weeks.",
        "My refund for {order} shows as pending. What does that mean and when will it be done?",
        "I only got {amount} back but I paid more than that. Why was my refund partial?",
        "The courier confirmed my return was delivered on {date}. When do I get my money back?",
        "refund status for order {order}?",
        "Has my refund been approved yet? I sent the {product} back on {date}.",
        "My bank says there's no incoming refund from you. Can you give me a refund reference number?",
        "You promised me a refund of {amount} for the late delivery. I still haven't received it.",
        "Is my refund going back to my {card} or coming as store credit?",
        "It's been {days} days since you got my return. Where's the refund??",
        "Could you check on the refund for my returned {product}? Order {order}.",
        "The refund still isn't showing on my {card} statement. Please look into it.",
        "I got an email saying my return was received but nothing about the refund. What's the status?",
        "When will the {amount} be credited back to my account?",
        "Can you tell me if the refund for {order} has actually been sent?",
        "I returned two items in the same package but only one of them was refunded.",
        "my refund is taking forever, order {order}, returned it ages ago",
        "Please update me on my refund. I returned the {product} on {date} and I need that money.",
        "Your site says 'refund issued' but my {card} hasn't been credited. How long should it take?",
        "I'm checking whether the refund for my cancelled order went through.",
        "The refund you sent me is {amount} short. Can you explain why?",
        "I sent back the {product} from order {order} on {date} using your prepaid label, and tracking shows it reached your warehouse a few days later. Your policy says refunds take five to seven working days, but it's been over two weeks and the {amount} still hasn't appeared on my {card}. Can you check what's happening with the refund?",
        "Last month I cancelled order {order} before it shipped and got an email saying the refund of {amount} was on its way. My bank says nothing has come in from you since. Could you tell me the date the refund was sent and give me a reference I can pass to my bank?",
    ],
    "damaged_item": [
        "My {product} arrived broken.",
        "The {product} I received has a big crack in it.",
        "The box was crushed and the {product} inside is damaged. Order {order}.",
        "The {product} was scratched all over when I opened it.",
        "Order {order} came today and the {product} is smashed. What can you do?",
        "the {product} doesnt turn on, looks like it got damaged in shipping",
        "Half the items in my package were soaked and ruined when they arrived.",
        "My {garment} came with a torn seam and a big stain on it.",
        "The glass on the {product} is shattered. I'd like a replacement.",
        "The package arrived with a hole in it and the {product} is dented.",
        "I just unboxed the {product} and one of the parts is snapped off.",
        "The bottle in my order leaked all over the box and ruined everything else in it.",
        "Can I get a replacement? The {product} showed up damaged.",
        "Your courier clearly threw my parcel around. The {product} is in pieces.",
        "My {product} arrived with a dent in the side and it rattles when I move it.",
        "Order {order} came today and the {product} is cracked straight out of the box.",
        "I'm really disappointed, the {product} I ordered as a gift arrived broken.",
        "Opened my delivery and the {product} is chipped. Can you send a new one?",
        "The {garment} has a big rip in it, and it came like that.",
        "The packaging looked fine but the {product} inside is bent out of shape.",
        "I have photos: the {product} from order {order} arrived damaged. How do I get this fixed?",
        "Everything in the box was crushed, including the {product}.",
        "my {product} is broken on arrival!!",
        "The {product} arrived with a broken hinge and a loose panel.",
        "The chocolates in my order arrived completely melted and the box was soaked.",
        "I received the {product} today but it has a huge scratch across the front. Not acceptable for {amount}.",
        "The {product} arrived damaged and now it doesn't work at all.",
        "My {product} was delivered this morning. The outer box looked fine, but when I opened it the item inside was cracked down one side and several pieces were rattling around loose. It clearly wasn't packed with enough protection. I have photos if you need them. Can you send a replacement?",
        "I ordered a {product} as a wedding gift and it arrived today badly dented and with a broken handle. The box was crushed on one corner, so I think it was dropped in transit. The wedding is on {date}, so I need a replacement quickly. What are my options?",
    ],
    "wrong_item": [
        "I ordered a {product} but received a {product2}.",
        "You sent me the wrong item. Order {order}.",
        "I ordered the {garment} in {color} but got it in {color2}.",
        "I ordered size {size} and received size {size2}.",
        "This isn't what I ordered. I got a {product2} instead of the {product}.",
        "The package had someone else's order in it. None of it is mine.",
        "wrong item in my box, i ordered a {product} not this",
        "Order {order} was supposed to include a {product} but there's a {product2} in the box instead.",
        "I received the wrong model of the {product}, not the one I picked.",
        "You sent the {garment} in the wrong size. I ordered {size}, the label says {size2}.",
        "The item I got is a completely different product from the one I ordered.",
        "Got a {color2} {product} but I picked {color} at checkout.",
        "I think my order got mixed up with someone else's. The name on the packing slip isn't mine and neither are the items.",
        "Order {order} arrived but it's the wrong product. How do I get the right one?",
        "The box says {product} but inside is a {product2}.",
        "I ordered three items and received three items, just not the ones I ordered.",
        "you guys sent me a {product2}?? i ordered a {product}",
        "I received the {garment} in a kids' size when I ordered adult {size}.",
        "I ordered the vanilla flavour and you sent chocolate.",
        "I got the wrong colour. I ordered {color} and this is {color2}.",
        "My box contained a {product2} I never ordered, and the {product} I paid for isn't there.",
        "Wrong item delivered for order {order}, please send the correct one.",
        "The pack size is wrong: I ordered the 12-pack and got a single one.",
        "I ordered the {product} but got a different brand's version of it.",
        "Somebody at the warehouse packed the wrong thing. I'm holding a {product2} and I wanted a {product}.",
        "Just opened order {order}: wrong item. I need the {product} I actually bought.",
        "I ordered the {garment} in {color}, size {size}, for a trip on {date}. The parcel arrived today and inside is the same {garment} but in {color2} and size {size2}. The packing slip lists what I ordered, so it seems the warehouse picked the wrong one. Can you send the correct item in time?",
        "Order {order} arrived this afternoon, but instead of the {product} I paid for, the box contains a {product2}. I've double-checked my order confirmation and I definitely selected the {product}. Could you arrange for the right item to be sent and let me know what to do with this one?",
    ],
    "cancel_order": [
        "Please cancel my order {order}.",
        "I placed an order by mistake earlier today, can I cancel it?",
        "Can I still cancel order {order}? It hasn't shipped yet.",
        "cancel my order pls",
        "I ordered the {product} twice by accident. Please cancel one of the orders.",
        "I found the {product} cheaper elsewhere. Please cancel my order before it ships.",
        "How do I cancel an order I just placed?",
        "I'd like to cancel order {order}, I no longer need it.",
        "The delivery estimate is too long for me. Cancel my order {order} please.",
        "Is it too late to cancel? I ordered the {product} an hour ago.",
        "Please stop order {order} from being shipped, I want to cancel it.",
        "I need to cancel the {product} from my order but keep the rest.",
        "There's no cancel button on my order page. Can you cancel {order} for me?",
        "I changed my mind about the {product}, please cancel the order before it goes out.",
        "cancel order {order} asap, i picked the wrong one at checkout",
        "I want to cancel order {order} that I placed on {date}. I'll reorder later.",
        "Please cancel the whole order, I don't want it anymore.",
        "Can you cancel my order for the {product}? It hasn't been sent yet.",
        "I'd like to cancel an order I placed earlier today for a {product}.",
        "Order {order} was a gift for an event that's been called off. Please cancel it.",
        "Please don't ship order {order}. I need to cancel it.",
        "I need to cancel an order I made on {date}, it still says processing.",
        "Is there a fee to cancel an order that hasn't been shipped?",
        "I want to cancel the order I placed for the {product}.",
        "How can I cancel order {order}? The app won't let me.",
        "Ordered a {product} last night after a long day and regret it. Can you cancel it before it ships?",
        "I placed order {order} about twenty minutes ago for a {product}, but I've just realised my partner already bought one for us yesterday. The order page still says 'processing', so I hope it isn't too late. Please cancel the whole order before it's dispatched. I don't want a replacement or store credit.",
        "I ordered a {product} on {date}, but the estimated delivery has now moved back by three weeks and I need it for an event before then. I'd rather buy it locally. Can you please cancel order {order} while it hasn't shipped and confirm by email?",
    ],
    "change_address": [
        "I need to change the shipping address on order {order}.",
        "I moved to {city}. Can you update the delivery address for my order?",
        "Wrong address on my order! It should be {street}, {city}.",
        "Can I change where my package is delivered? I won't be home that week.",
        "please update delivery address for {order} to {street}",
        "I made a typo in my address at checkout, the house number should be {num}.",
        "Can you ship order {order} to my office instead of my home address?",
        "My order is going to my old apartment. Can you redirect it to {street}, {city}?",
        "Is it possible to change the delivery address after the order is placed?",
        "I put my work address as the shipping address by mistake. Can you change it to my home address?",
        "The postcode on order {order} is wrong. Please correct it before it ships.",
        "Please send the {product} to my parents' address in {city} instead.",
        "Can you change the delivery address on my order? I'll be staying in {city} until {date}.",
        "update address pls, order {order}, new one is {street} {city}",
        "I forgot to add my apartment number to the shipping address. It's apt {num}.",
        "I need my order delivered to a different address than the one on file.",
        "How do I edit the delivery address on an order that hasn't shipped?",
        "We're moving on {date}. Can you change the shipping address for my pending order?",
        "Is it too late to change the delivery address for order {order}?",
        "The street name on my order is misspelled, please change it to {street}.",
        "Can the courier deliver to {street} instead? That's my new address.",
        "I'd like to redirect my {product} to a pickup point in {city}.",
        "Please change the delivery address on order {order}, it's a gift for my sister in {city}.",
        "I accidentally picked an old saved address at checkout. Can you swap it to {street}, {city}?",
        "can i change the shipping address on an order i already placed",
        "My address changed last week. Order {order} still has the old one, please update it.",
        "I placed order {order} yesterday, but I've just realised the checkout used my old address from two years ago. I now live at {street}, {city}. The order hasn't shipped yet according to my account, so could you please update the delivery address before it goes out? I don't want it to end up with the new tenants.",
        "My {product} is due to be delivered next week, but I'm going to be staying with family in {city} until {date}. Would it be possible to change the delivery address on the order to {street}, {city}, so I'm there to receive it?",
    ],
    "payment_failed": [
        "My payment keeps getting declined at checkout.",
        "I tried to pay with my {card} and it says transaction failed.",
        "Why was my card declined? There's plenty of money on it.",
        "checkout wont accept my card",
        "I get 'payment error, please try again' every time I try to buy the {product}.",
        "The payment failed but I think I was still charged {amount}. Did my order go through?",
        "My {card} payment was rejected even though the details are correct.",
        "The 3D Secure check keeps failing when I try to pay.",
        "Can't complete my purchase, the payment page just spins and then errors out.",
        "I tried three different cards and none of them work on your site.",
        "Your site says my billing address doesn't match my card, but it does. The payment won't go through.",
        "Payment declined for {amount}. My bank says they didn't block anything.",
        "PayPal checkout fails with an error every single time.",
        "I can't pay for my order, the card field keeps showing 'invalid card number'.",
        "I'm trying to buy a {product} and the payment fails at the last step.",
        "Why does my payment keep failing? I've tried {days} times now.",
        "The order page said 'payment unsuccessful'. What should I do?",
        "Apple Pay isn't working on your checkout.",
        "My card was declined but my bank shows a pending charge of {amount}.",
        "Gift card payment failed at checkout, it says 'unable to process'.",
        "I keep getting an error when I enter my card details. I really want to order the {product} today.",
        "payment not going through, tried my {card} and another card too",
        "The checkout says 'your payment could not be authorized'. Why?",
        "Every time I click Pay, it sends me back to the cart with a payment error.",
        "My payment failed for order {order}. Can I retry it somehow?",
        "My card keeps getting declined from {city}. Is it because I'm ordering from abroad?",
        "I've been trying to buy a {product} for the last hour. I add it to the cart, enter my {card} details, and every time the checkout says 'payment declined'. My bank confirmed there are no blocks on the card and I have enough funds. I also tried a different browser. What else can I do to get the payment to go through?",
        "Checkout failed twice tonight with an error saying my payment could not be processed, yet I can see two pending charges of {amount} in my banking app. I don't have an order confirmation. Can you tell me whether the payment went through or not?",
    ],
    "password_reset": [
        "I forgot my password.",
        "I can't log in to my account. How do I reset my password?",
        "The password reset email never arrives.",
        "reset password link expired, can you send a new one",
        "My account is locked after too many login attempts.",
        "I'm not receiving the password reset code at {email}.",
        "How do I change my account password?",
        "The reset link says 'invalid token' when I click it.",
        "Can't sign in, it says my password is wrong but I'm sure it's right.",
        "I need to reset my password but I no longer have access to my old email.",
        "forgot pw, help",
        "I've tried resetting my password {days} times and it still won't let me in.",
        "Your site keeps saying 'incorrect password'. Please help me get back into my account.",
        "Where is the 'forgot password' option in the app?",
        "I set a new password yesterday and now it doesn't work.",
        "Can you send a password reset link to {email}?",
        "Locked out of my account, I need to reset my login.",
        "The reset page won't accept my new password, says it doesn't meet the requirements but it does.",
        "I can't remember my password and I want to check my orders.",
        "Password reset emails are going nowhere, and I checked spam too.",
        "I think someone changed my password. I can't log in anymore.",
        "how do i reset my password on the mobile app",
        "Every time I reset my password it logs me out and the new one doesn't work.",
        "I need help getting into my account, I forgot the password and the security question answer.",
        "I need to reset my password but the reset button does nothing.",
        "My login stopped working after I changed my email. Can you reset my password?",
        "I haven't logged in for a while and can't remember my password. I clicked 'forgot password' three times, but the reset email never arrived, not even in the spam folder. The email on my account should be {email}. Could you send the reset link manually or tell me another way to get back into my account?",
        "This morning the app logged me out and now says my password is incorrect, although I haven't changed it. I tried the reset link but it says the link has expired as soon as I open it. I need to get into my account to check my orders. Can you help me reset my password?",
    ],
    "cancel_subscription": [
        "How do I cancel my {plan}?",
        "Please cancel my {plan}.",
        "I want to stop my monthly subscription.",
        "I don't want to be charged for the {plan} anymore. Cancel it please.",
        "unsubscribe me from the {plan}, i never use it",
        "I signed up for a free trial of the {plan} and want to cancel before I'm billed.",
        "Please turn off auto-renewal on my membership, I want it to end.",
        "How do I stop the recurring {amount} charge for my {plan}? I want to cancel it.",
        "Please end my subscription at the end of this billing period.",
        "I can't find where to cancel my {plan} in my account settings.",
        "I was charged {amount} for a {plan} renewal I didn't want. Cancel it going forward.",
        "Cancel my membership please. It's too expensive for me right now.",
        "I'd like to cancel my subscribe-and-save delivery for coffee beans.",
        "How do I stop my {plan} from renewing on {date}?",
        "Please close my {plan}, I'm moving abroad.",
        "cancel subscription",
        "My {plan} renewed automatically and I didn't want it to. Please cancel it.",
        "I've been trying to cancel my {plan} for weeks. The cancel button doesn't work.",
        "I want to end my {plan}. Thanks for everything.",
        "Can I pause or cancel my {plan}? I'd rather cancel if pausing isn't possible.",
        "Please make sure I'm not billed again for the {plan}. I want to cancel.",
        "Stop sending me the monthly box, I want to cancel the subscription.",
        "I no longer need the {plan}. How do I opt out of the renewal?",
        "Cancel my {plan} effective immediately please.",
        "Is there a penalty if I cancel my {plan} early when I paid for the whole year?",
        "My free trial turned into a paid {plan}. I want to cancel it now.",
        "I signed up for the {plan} last year mainly for the free shipping, but I barely order anything now. I've looked through my account settings and can't find any option to cancel. Please cancel it so I'm not charged the {amount} renewal on {date}, and send me a confirmation email.",
        "My {plan} renewed automatically today and I was charged {amount}. I meant to cancel before the renewal but forgot, and I don't want to keep it. Please cancel the subscription and make sure there are no further charges.",
    ],
    "invoice_request": [
        "Can I get an invoice for order {order}?",
        "I need a VAT invoice for my purchase.",
        "Please send me a receipt for the {product}.",
        "Where can I download the invoice for my order?",
        "My company needs an invoice with our business name on it for order {order}.",
        "can you email me the receipt for {order}",
        "I need an itemised invoice for my expense report.",
        "The invoice I received has the wrong company name on it. Can you reissue it?",
        "Can you add our VAT number to the invoice for order {order}?",
        "I lost the receipt for the {product} I bought on {date}. Can you resend it?",
        "Please send me invoices for all my orders from {month}.",
        "I need a proof of purchase document for the {product} for a warranty claim.",
        "Is it possible to get a PDF invoice for order {order}?",
        "My accountant needs the invoices for last quarter's orders.",
        "The invoice doesn't show the tax breakdown. Can I get one that does?",
        "Could you send a copy of the invoice for {amount} to {email}?",
        "invoice for order {order} please, need it for reimbursement at work",
        "I can't find the invoice in my account, only the order confirmation.",
        "Please make the invoice out to my company instead of to me personally.",
        "Can I get a gift receipt without prices for the {product}?",
        "I need a duplicate invoice for order {order}, the original got lost.",
        "Where do I find receipts for my past orders?",
        "We're a business customer and need a proper tax invoice for our {amount} purchase.",
        "Could you send me the invoice for the {product} I ordered on {date}?",
        "I need a receipt for order {order} with my full name on it.",
        "The invoice download link in my account is broken. Can you email me the invoice instead?",
        "I bought a {product} for the office on {date} using my personal card, and my employer needs a proper invoice before they reimburse me. The order confirmation email isn't enough because it doesn't show the VAT. Could you send an invoice for order {order} with the company name and VAT breakdown on it?",
        "I'm doing my taxes and need invoices for every order I placed with you in {month}. My account only shows order confirmations, and the download button doesn't produce anything. Could you please email the invoices to {email}?",
    ],
    "promo_code": [
        "My promo code {code} isn't working.",
        "The discount code says invalid at checkout.",
        "Where do I enter a promo code?",
        "I forgot to apply my discount code {code} to order {order}. Can you still add it?",
        "code {code} not working??",
        "Your email said {code} gives {pct}% off but the checkout won't accept it.",
        "Can I use two promo codes on the same order?",
        "The coupon was applied but the price didn't change.",
        "Does the code {code} work on sale items?",
        "It says my promo code has expired but the email says it's valid until {date}.",
        "I was promised a {pct}% off code for signing up but never received it.",
        "Is there a discount code for first-time customers?",
        "The {code} code only took off {off} instead of {pct}%.",
        "The promo code box disappeared from checkout. How do I use my code?",
        "My friend's referral code isn't giving me the discount.",
        "Why won't {code} work on the {product}?",
        "My student discount code isn't applying at checkout.",
        "I got a voucher code in my birthday email, but it says 'not eligible'.",
        "Can you apply the code {code} retroactively? I just placed the order.",
        "promo code says minimum spend not met but my cart is {amount}",
        "Do you have any coupon codes right now?",
        "The free shipping code isn't removing the shipping fee.",
        "I entered {code} and it said 'code already used', but I've never used it.",
        "How do I redeem the discount code from your newsletter?",
        "The influencer code {code} is giving an error. Is it still active?",
        "My {pct}% off code worked in the app but not on the website.",
        "I signed up for your newsletter and got the code {code} for {pct}% off my first order. When I enter it at checkout it says 'this code is not valid', even though I'm a new customer and my basket is well above the minimum spend. Could you check the code, or apply the discount to my order manually?",
        "I placed order {order} on {date} and only realised afterwards that I forgot to enter the discount code {code}, which was in the email you sent me that morning. Is there any way to apply the discount to that order now?",
    ],
}

# Slot values: everyday store catalogue and customer details (all invented).
PRODUCTS = [
    "coffee grinder",
    "pair of wireless earbuds",
    "yoga mat",
    "desk lamp",
    "blender",
    "phone case",
    "backpack",
    "rice cooker",
    "sonic toothbrush",
    "bluetooth speaker",
    "cast iron pan",
    "smartwatch",
    "kettle",
    "gaming mouse",
    "mechanical keyboard",
    "standing fan",
    "table lamp",
    "water bottle",
    "set of kitchen knives",
    "hair dryer",
    "webcam",
    "baby monitor",
    "dog bed",
    "tent",
    "camping stove",
    "board game",
    "vacuum cleaner",
    "laptop stand",
    "ceramic vase",
    "set of bath towels",
]
GARMENTS = [
    "running shoes",
    "denim jacket",
    "wool sweater",
    "rain jacket",
    "hiking boots",
    "linen shirt",
    "summer dress",
    "pair of jeans",
    "winter coat",
    "hoodie",
    "pair of sneakers",
    "leggings",
]
COLOURS = ["black", "navy", "white", "red", "forest green", "grey", "beige", "pink", "sky blue"]
SIZES = ["XS", "S", "M", "L", "XL", "8", "10", "12", "42", "44"]
CITIES = [
    "Leeds",
    "Manchester",
    "Bristol",
    "Dublin",
    "Lyon",
    "Berlin",
    "Madrid",
    "Austin",
    "Denver",
    "Toronto",
    "Chicago",
    "Glasgow",
    "Rotterdam",
    "Portland",
    "Seattle",
    "Munich",
    "Boston",
]
STREETS = [
    "Elm Road",
    "Station Street",
    "Maple Avenue",
    "Church Lane",
    "Harbour View",
    "Oak Close",
    "Mill Road",
    "Victoria Street",
    "Cedar Drive",
    "Park Terrace",
]
MONTHS = list(calendar.month_name)[1:]  # English: Python never sets LC_TIME from the environment
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]  # templates say "on {date}"
CARDS = ["Visa", "Mastercard", "Amex card", "debit card", "credit card", "PayPal account"]
PLANS = [
    "Plus membership",
    "Premium plan",
    "VIP club membership",
    "monthly snack box subscription",
    "Fast Shipping Pass",
    "coffee subscription",
    "Gold membership",
    "beauty box subscription",
]
CODES = [
    "SPRING20",
    "WELCOME10",
    "SAVE15",
    "FREESHIP",
    "BLACKFRIDAY",
    "VIP25",
    "SUMMER30",
    "NEWYOU",
    "THANKS5",
    "HOLIDAY40",
]
NAMES = ["Sam", "Priya", "Tom", "Ana", "Jordan", "Mei", "Lukas", "Fatima", "Chris", "Olga", "Dan", "Aisha"]

# Decorations that carry no intent, so they never change the label.
# They end in "!" or "." so the message after them can keep its capital letter.
GREETINGS = [
    "Hi!",
    "Hello.",
    "Hey!",
    "Hi there!",
    "Good morning.",
    "Hello team!",
    "Hi support.",
    "Good afternoon.",
    "Hello there.",
]
PREAMBLES = [
    "Sorry to bother you.",
    "Quick question.",
    "I've been a customer for years.",
    "I'm writing on behalf of my mum, who doesn't use email.",
    "Hope you're well.",
    "I tried the help centre first but couldn't find an answer.",
    "First time ordering from you.",
    "I'm on my phone so excuse the brevity.",
    "I ordered a few things from you last month and have mostly been happy.",
    "I called yesterday but was on hold for forty minutes, so I'm trying email instead.",
]
ANNOYED = [
    "This is really frustrating.",
    "Please sort this out ASAP.",
    "I'm not happy about this at all.",
    "I expected better from you.",
    "This is the second time I'm writing about this.",
    "Seriously?",
    "I need an answer today.",
]
SIGNOFFS = [
    "Thanks.",
    "Thank you!",
    "Thanks in advance.",
    "Cheers, {name}",
    "Regards, {name}",
    "Many thanks, {name}",
    "Appreciate the help.",
    "thx",
    "Best, {name}",
]
# Misspellings real customers make; one may be applied to a message.
TYPOS = {
    "receive": "recieve",
    "address": "adress",
    "password": "pasword",
    "order": "oder",
    "received": "recieved",
    "cancel": "cancle",
    "refund": "refudn",
    "please": "plese",
    "invoice": "invoce",
    "delivery": "delivary",
    "because": "becuase",
    "package": "pakage",
    "discount": "discoutn",
    "subscription": "subscripton",
    "tracking": "traking",
}


def slot_values(rng: random.Random) -> dict[str, str]:
    """One random value per slot; templates use whichever they name (format_map ignores the rest)."""
    product, product2 = rng.sample(PRODUCTS, 2)
    colour, colour2 = rng.sample(COLOURS, 2)
    size, size2 = rng.sample(SIZES, 2)
    digits = str(rng.randint(10000, 99999))
    month = rng.choice(MONTHS)
    currency = rng.choice(["$", "€", "£"])
    name = rng.choice(NAMES)
    return {
        "order": ("#" + digits) if rng.random() < 0.75 else digits,
        "product": product,
        "product2": product2,
        "garment": rng.choice(GARMENTS),
        "color": colour,
        "color2": colour2,
        "size": size,
        "size2": size2,
        "date": rng.choice(
            [f"{month} {rng.randint(1, 28)}", f"the {_ordinal(rng.randint(1, 28))}", rng.choice(WEEKDAYS)]
        ),
        "month": month,
        "city": rng.choice(CITIES),
        "street": f"{rng.randint(1, 240)} {rng.choice(STREETS)}",
        "num": str(rng.randint(1, 60)),
        "amount": f"{currency}{rng.randint(5, 400)}" + rng.choice(["", ".99", ".50", f".{rng.randint(10, 89)}"]),
        "off": f"{currency}{rng.randint(2, 15)}",
        "days": str(rng.randint(3, 21)),
        "card": rng.choice(CARDS),
        "plan": rng.choice(PLANS),
        "code": rng.choice(CODES),
        "pct": str(rng.choice([5, 10, 15, 20, 25, 30, 40])),
        "email": f"{name.lower()}{rng.randint(1, 99)}@{rng.choice(['gmail.com', 'outlook.com', 'mail.com'])}",
        "name": name,
    }


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def decorate(text: str, rng: random.Random, slots: dict[str, str]) -> str:
    """Wrap a core message in optional greeting/preamble/tone/sign-off, then maybe casual casing or a typo."""
    parts = [text]
    if rng.random() < 0.15:
        parts.insert(0, rng.choice(PREAMBLES))
    if rng.random() < 0.3:
        parts.insert(0, rng.choice(GREETINGS))
    if rng.random() < 0.12:
        parts.append(rng.choice(ANNOYED))
    if rng.random() < 0.25:
        parts.append(rng.choice(SIGNOFFS).format_map(slots))
    message = " ".join(parts)
    if rng.random() < 0.12:  # typed in a hurry: all lower case, no final punctuation
        message = message.lower().rstrip(".!")
    if rng.random() < 0.12:
        message = add_typo(message, rng)
    return message


def add_typo(text: str, rng: random.Random) -> str:
    """Misspell one known word if present, else swap two letters inside a longer word."""
    present = [w for w in TYPOS if re.search(rf"\b{w}\b", text)]
    if present:
        word = rng.choice(present)
        return re.sub(rf"\b{word}\b", TYPOS[word], text, count=1)
    words = text.split(" ")
    long_ones = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 6]
    if not long_ones:
        return text
    i = rng.choice(long_ones)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def normalise(text: str) -> str:
    """The key two prompts must differ on: case and whitespace don't make a new prompt."""
    return " ".join(text.lower().split())


def example_prompts(task_path: Path) -> set[str]:
    """Worked-example prompts from task.yaml (stdlib only: they are JSON-style double-quoted scalars)."""
    if not task_path.is_file():
        return set()
    found = re.findall(r'^\s*-\s*prompt:\s*(".*")\s*$', task_path.read_text(encoding="utf-8"), re.M)
    return {normalise(json.loads(q)) for q in found}


def generate(rng: random.Random, excluded: set[str]) -> list[dict[str, str]]:
    """PER_LABEL distinct prompts per label, shuffled, with sequential ids."""
    seen = set(excluded)
    rows = []
    for label, templates in TEMPLATES.items():
        # Cycle through templates in shuffled rounds so every phrasing is used about equally often.
        count, attempts, order = 0, 0, []
        while count < PER_LABEL:
            attempts += 1
            if attempts > PER_LABEL * 50:
                raise RuntimeError(f"{label}: could not make {PER_LABEL} distinct prompts")
            if not order:
                order = rng.sample(templates, len(templates))
            slots = slot_values(rng)
            prompt = decorate(order.pop().format_map(slots), rng, slots)
            key = normalise(prompt)
            if key in seen or len(prompt.split()) >= MAX_WORDS:
                continue
            seen.add(key)
            rows.append({"prompt": prompt, "gold": label})
            count += 1
    rng.shuffle(rows)
    return [{"id": f"t{i:05d}", **row} for i, row in enumerate(rows, start=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "prompts.jsonl")
    args = parser.parse_args()
    rows = generate(random.Random(SEED), example_prompts(HERE / "task.yaml"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
